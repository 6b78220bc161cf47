"""`moejax parity`: one checkpoint run by moejax and by transformers (PyTorch, CPU) on the same tokens, compared
per token, per block and per MoE layer, with a verdict.

Two verdicts, by moejax's dtype:
- float32 (the verdict on the implementation): moejax float32 against transformers float32, against fixed
  bounds. Both compute the same function; what is left is summation order. A token routed to another
  expert set counts as a near tie only when proven on the reference's own selection scores
  (moejax.routing.ties); then the reference's experts are forced into moejax's routing at that token and
  layer (`ForcedRouting`) and moejax runs again, so every token of every block is still compared like for
  like. Any other flip fails, as does a rate of near ties above what float32 rounding produces.
- 16-bit (calibrated): moejax in bfloat16 (or float16) against transformers in float32, and the reference's
  own rounding error, transformers in the same 16-bit dtype against transformers float32 on the same
  tokens, as the yardstick: moejax's error must stay within `calibration_multiple` times it, per block and
  overall. A 16-bit verdict cannot be judged by fixed numbers: real errors hide below them.

The reference runs under torch.no_grad on the CPU with forward hooks recording, per batch, each decoder
layer's output and each router's logits and chosen experts over the content tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from tqdm import tqdm

from moejax.commands.options import MESH_HELP, check_options, option
from moejax.config import read_config_json
from moejax.data.corpus import chunk, read_corpus
from moejax.data.tokenize import HFTokenizer
from moejax.errors import CheckpointError, ConfigError, DataError, SettingsError
from moejax.io import check_output, output_directory, versions, write_csv
from moejax.loading import from_pretrained, load_config
from moejax.models.common import ForcedRouting
from moejax.parallel.mesh import describe, make_mesh
from moejax.report.figures import drift_figure
from moejax.routing import metrics as M
from moejax.routing.ties import EXACT_TIE, OTHER, RouterRule, classify_flips, differing


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The bounds `moejax parity` checks. float32 verdict: KL in nats, agreements as fractions of content
    tokens, None = reported, not checked. Calibrated (16-bit) verdict: `calibration_multiple` alone."""

    kl_mean: float | None = None  # mean over tokens of KL(reference || moejax), at most
    kl_p99: float | None = None  # the 99th percentile of the per-token KL, at most
    kl_max: float | None = None  # the largest per-token KL, at most
    top1_agreement: float | None = None  # tokens whose argmax token is the same, at least
    expert_set_agreement: float | None = None  # per MoE layer, tokens with identical expert sets, at least
    router_logit_max_abs: float | None = None  # per MoE layer, the largest |router logit difference|, at most
    router_logit_relative: float | None = None  # per MoE layer, ||z_moejax - z_ref|| / ||z_ref||, at most
    hidden_relative: float | None = None  # per block, ||h_moejax - h_ref|| / ||h_ref|| over content tokens, at most
    other_flips: float | None = None  # per MoE layer, routing flips that are not proven near ties, at most
    tie_rate: float | None = None  # per MoE layer, near ties (beyond exact ones) per token, at most
    calibration_multiple: float | None = None  # 16-bit: moejax's error over the reference's own, at most


# float32: both sides compute the same function in float32; what is left is summation order, ~1e-6 relative
# per layer. Observed on the tiny and bench models: KL ~1e-11, router logits ~1e-6, hidden states ~1e-7
# relative. The bounds leave two to three orders of magnitude for a 48-layer model and fail on any real
# difference (a wrong norm, a missing bias: hidden states off by > 1e-2). Near ties: one in ~40,000
# token-layers was measured on the bench models; 1e-3 per layer is 40 times that (and a single tie in a
# short run is never a rate).
#
# Calibrated: moejax and transformers round to 16 bits at different places (fused vs unfused ops, float32
# vs 16-bit accumulation, moejax's float32 router, norms and SSD state), so moejax's error against the
# float32 reference is of the order of transformers' own, not equal to it. The figures compared are medians of
# per-token errors (a 16-bit routing flip moves a few tokens a lot, on either side, by chance). Measured on both
# architectures' tiny test checkpoints (3 seeds, docs/parity.md): moejax's median over transformers' stays within
# 0.82-1.24 per block and 0.71-1.19 for the per-token KL (which grows as the square of a logit error, hence the
# squared multiple), while a 20% error in one layer's expert down projections gives 7.7-16.5 at its block and a
# 10% error in one norm weight 4.5-6.1. A multiple of 2 sits between the two.
TOLERANCES = {
    "float32": Tolerances(kl_mean=1e-6, kl_p99=1e-5, kl_max=1e-4, top1_agreement=0.999, router_logit_max_abs=1e-3,
                          router_logit_relative=1e-4, hidden_relative=1e-4, other_flips=0, tie_rate=1e-3),
    "calibrated": Tolerances(calibration_multiple=2.0),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The unit roundoff of each 16-bit dtype: the floor of the reference's own error in the calibrated bounds
# (a block or token where transformers' 16-bit run happens to round to nothing is not a zero yardstick).
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -11}


def tolerances_for(mode: str, overrides: dict[str, float] | None = None) -> Tolerances:
    """The default bounds of a verdict mode ("float32" or "calibrated"), with `overrides` (field -> value)."""
    return dataclasses.replace(TOLERANCES[mode], **(overrides or {}))


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json records (`dtype`, or `torch_dtype` before transformers 5); float32 if none."""
    hf = read_config_json(model_dir / "config.json")
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"{model_dir / 'config.json'}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return name


# ---------------------------------------------------------------------------------------------- tokens


@dataclasses.dataclass
class Sequence:
    group: str  # the language, or "text"
    ids: list[int]


def text_sequences(path: str | Path, tokenizer, seq_len: int, max_tokens: int) -> list[Sequence]:
    """A UTF-8 text file, tokenised paragraph by paragraph, joined and cut into sequences of seq_len tokens."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise DataError(f"{path}: no text")
    return _cut("text", paragraphs, tokenizer, seq_len, max_tokens)


def corpus_sequences(data: str | None, langs: list[str], tokenizer, seq_len: int, max_tokens: int,
                     skip_incomplete: bool = False) -> list[Sequence]:
    """Each language's paragraph chunks of a parallel corpus, joined and cut into seq_len-token sequences,
    max_tokens / len(langs) tokens per language (from the same sentences in every language)."""
    corpus = chunk(read_corpus(data, langs, skip_incomplete=skip_incomplete), 300, "paragraph")
    budget = max_tokens // len(langs)
    if budget < 1:
        raise SettingsError(f"--max-tokens {max_tokens} leaves no tokens for {len(langs)} languages")
    return [s for lang in langs for s in _cut(lang, corpus[lang], tokenizer, seq_len, budget)]


def _cut(group: str, texts: list[str], tokenizer, seq_len: int, budget: int) -> list[Sequence]:
    """Texts tokenised one by one (each with the tokenizer's special tokens) until `budget` tokens, joined,
    and cut into seq_len pieces."""
    stream: list[int] = []
    for text in texts:
        if len(stream) >= budget:
            break
        stream += tokenizer.encode(text)
    stream = stream[:budget]
    return [Sequence(group, stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]


def batches(sequences: list[Sequence], batch_size: int, pad_id: int):
    """(groups, ids [b, t], mask [b, t]): sequences in order, right-padded to the longest one."""
    width = max(len(s.ids) for s in sequences)
    for i in range(0, len(sequences), batch_size):
        part = sequences[i:i + batch_size]
        ids = np.full((len(part), width), pad_id, np.int64)
        mask = np.zeros((len(part), width), np.int64)
        for row, s in enumerate(part):
            ids[row, :len(s.ids)] = s.ids
            mask[row, :len(s.ids)] = 1
        yield [s.group for s in part], ids, mask


def _fill_rows(ids: np.ndarray, mask: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """moejax's copy of a short last batch, topped up to `rows` with repeats of its first row so every
    batch has one shape and compiles once; the extra rows' outputs are dropped."""
    extra = rows - len(ids)
    return np.concatenate([ids, ids[:1].repeat(extra, 0)]), np.concatenate([mask, mask[:1].repeat(extra, 0)])


# ---------------------------------------------------------------------------------------------- comparison


def token_kl(ref_nv: np.ndarray, got_nv: np.ndarray, rows: int = 64) -> np.ndarray:
    """Per row KL(softmax(ref) || softmax(got)) in nats, computed in float64 a few rows at a time."""
    out = np.empty(len(ref_nv))
    for i in range(0, len(ref_nv), rows):
        lp = _log_softmax(ref_nv[i:i + rows].astype(np.float64))
        lq = _log_softmax(got_nv[i:i + rows].astype(np.float64))
        out[i:i + rows] = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclasses.dataclass
class Outputs:
    """One side's outputs for a batch's content tokens (n of them, in row-major order): logits [n, V], per block
    its output [n, d], per MoE layer the raw router logits [n, E] and the chosen experts [n, k]."""

    logits: np.ndarray
    hidden: list[np.ndarray]
    router_logits: list[np.ndarray]
    router_ids: list[np.ndarray]


@dataclasses.dataclass
class BlockTally:
    """One block's output over the tokens compared: running sums, and each token's relative difference."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    tokens: int = 0
    token_relative: list = dataclasses.field(default_factory=list)

    def add(self, ref_nd: np.ndarray, got_nd: np.ndarray) -> None:
        self.tokens += len(ref_nd)
        ref_nd = ref_nd.astype(np.float64)
        diff = got_nd.astype(np.float64) - ref_nd
        sq_diff_n, sq_ref_n = (diff ** 2).sum(-1), (ref_nd ** 2).sum(-1)
        self.sq_diff += float(sq_diff_n.sum())
        self.sq_ref += float(sq_ref_n.sum())
        self.max_abs = _max_nan(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.token_relative.append(np.sqrt(sq_diff_n / np.maximum(sq_ref_n, 1e-300)))

    @property
    def relative(self) -> float:
        """||h - h_ref|| / ||h_ref|| over all the tokens' entries."""
        return _relative(self.sq_diff, self.sq_ref)

    def quantile(self, q: float) -> float:
        """A quantile of the tokens' own relative differences."""
        return float(np.quantile(np.concatenate(self.token_relative), q)) if self.tokens else float("nan")


@dataclasses.dataclass
class RouterTally:
    """Running figures for one MoE layer over every content token: router-logit differences, identical expert
    sets (per group too), Jaccard, top-K counts of each side, and the flips by kind."""

    experts: int
    max_abs: float = 0.0
    sum_abs: float = 0.0
    entries: int = 0
    sq_diff: float = 0.0
    sq_ref: float = 0.0
    same_sets: dict = dataclasses.field(default_factory=dict)  # group -> tokens with identical sets
    tokens: dict = dataclasses.field(default_factory=dict)  # group -> tokens
    jaccard_sum: float = 0.0
    ties: int = 0  # flips proven near ties, exact ones included
    exact_ties: int = 0
    other_flips: int = 0
    forced: int = 0  # tokens whose reference experts were forced into moejax's routing
    token_relative: list = dataclasses.field(default_factory=list)  # per token ||z - z_ref|| / ||z_ref||
    counts_ref: np.ndarray = None
    counts_got: np.ndarray = None

    def __post_init__(self):
        self.counts_ref = np.zeros(self.experts, np.int64)
        self.counts_got = np.zeros(self.experts, np.int64)

    def add(self, groups_n: np.ndarray, logits_ref_ne, ids_ref_nk, logits_got_ne, ids_got_nk, flips=None) -> None:
        """Adds n content tokens; `flips` (moejax.routing.ties.Flips) classifies those whose sets differ."""
        diff_ne = np.abs(logits_got_ne.astype(np.float64) - logits_ref_ne)
        self.max_abs = _max_nan(self.max_abs, float(diff_ne.max(initial=0.0)))
        self.sum_abs += float(diff_ne.sum())
        self.entries += diff_ne.size
        self.sq_diff += float((diff_ne ** 2).sum())
        sq_ref_n = (logits_ref_ne.astype(np.float64) ** 2).sum(-1)
        self.sq_ref += float(sq_ref_n.sum())
        self.token_relative.append(np.sqrt((diff_ne ** 2).sum(-1) / np.maximum(sq_ref_n, 1e-300)))
        ref_ne, got_ne = _membership(ids_ref_nk, self.experts), _membership(ids_got_nk, self.experts)
        shared_n = (ref_ne & got_ne).sum(-1)
        k = ids_ref_nk.shape[-1]
        same_n = ~differing(ids_ref_nk, ids_got_nk)
        self.jaccard_sum += float((shared_n / (2 * k - shared_n)).sum())
        for group in np.unique(groups_n):
            here = groups_n == group
            self.same_sets[group] = self.same_sets.get(group, 0) + int(same_n[here].sum())
            self.tokens[group] = self.tokens.get(group, 0) + int(here.sum())
        self.counts_ref += ref_ne.sum(0)
        self.counts_got += got_ne.sum(0)
        if flips is not None:
            self.ties += int(flips.ties.sum())
            self.exact_ties += int((flips.kind == EXACT_TIE).sum())
            self.other_flips += int((flips.kind == OTHER).sum())

    @property
    def total(self) -> int:
        return sum(self.tokens.values())

    def agreement(self, group: str | None = None) -> float:
        """Tokens with identical expert sets, over every content token (of `group`); ties count as different."""
        if group is None:
            return sum(self.same_sets.values()) / max(self.total, 1)
        return self.same_sets.get(group, 0) / max(self.tokens.get(group, 0), 1)

    def median_relative(self) -> float:
        return float(np.median(np.concatenate(self.token_relative))) if self.total else float("nan")

    @property
    def misses(self) -> int:
        """Tokens routed to another expert set."""
        return self.total - sum(self.same_sets.values())

    @property
    def near_tie_rate(self) -> float:
        """Near ties beyond exact ones, per content token."""
        return (self.ties - self.exact_ties) / max(self.total, 1)


def _relative(sq_diff: float, sq_ref: float) -> float:
    """sqrt(sq_diff / sq_ref): 0 only for two zero signals, NaN whenever either sum is."""
    if math.isnan(sq_diff) or math.isnan(sq_ref):
        return float("nan")
    return (sq_diff / sq_ref) ** 0.5 if sq_ref > 0 else (0.0 if sq_diff == 0 else float("inf"))


def _max_nan(a: float, b: float) -> float:
    """The larger of two figures, NaN if either is (a NaN difference must never read as 0)."""
    return float("nan") if math.isnan(a) or math.isnan(b) else max(a, b)


def _worst(rows: list[dict], column: str, lowest: bool = False) -> dict:
    """The row with the worst value of `column` (the highest, or the lowest), a NaN being the worst of all."""
    def badness(row):
        value = row[column]
        return math.inf if math.isnan(value) else (-value if lowest else value)
    return max(rows, key=badness)


def _membership(ids_nk: np.ndarray, experts: int) -> np.ndarray:
    member = np.zeros((len(ids_nk), experts), bool)
    np.put_along_axis(member, np.asarray(ids_nk, np.int64), True, axis=-1)
    return member


class SideTally:
    """One side's outputs against the float32 reference's, accumulated over batches: per block, per MoE layer
    and per token (KL, top-1 agreement, group)."""

    def __init__(self, cfg):
        self.blocks = [BlockTally() for _ in cfg.layer_kinds]
        self.routing = [RouterTally(cfg.num_routed_experts) for _ in cfg.moe_layers]
        self.kl_n, self.top1_n, self.group_n = [], [], []

    def add_tokens(self, groups_n: np.ndarray, ref: Outputs, got: Outputs) -> None:
        self.kl_n.append(token_kl(ref.logits, got.logits))
        finite = np.isfinite(ref.logits).all(-1) & np.isfinite(got.logits).all(-1)
        self.top1_n.append((ref.logits.argmax(-1) == got.logits.argmax(-1)) & finite)
        self.group_n.append(groups_n)

    def per_token(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate(x) for x in (self.kl_n, self.top1_n, self.group_n))


# ---------------------------------------------------------------------------------------------- the reference


def load_reference(model_dir: Path, dtype: str, quiet: bool = False):
    """transformers' model for the checkpoint, in `dtype`, on the CPU, in eval mode (no remote code)."""
    import torch  # the test extra: every other command runs without PyTorch

    if quiet:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True,
                                                              trust_remote_code=False)
    return model.eval()


def _reference_modules(reference, cfg) -> tuple[list, dict[int, object]]:
    """The reference's decoder layers (one per moejax block) and its routers by block index."""
    layers = reference.model.layers
    if len(layers) != len(cfg.layer_kinds):
        raise CheckpointError(f"the reference has {len(layers)} decoder layers, moejax's config {len(cfg.layer_kinds)}")
    routers = {}
    for name, module in reference.named_modules():
        found = re.search(r"layers\.(\d+)\.", name)
        if found and type(module).__name__.lower().endswith("topkrouter"):
            routers[int(found.group(1))] = module
    if sorted(routers) != list(cfg.moe_layers):
        raise CheckpointError(f"the reference's routers sit in blocks {sorted(routers)}, moejax's MoE layers in "
                         f"{list(cfg.moe_layers)}")
    return list(layers), routers


class Recorder:
    """Forward hooks on a reference model recording, for one batch at a time, each decoder layer's output and
    each router's logits and chosen experts over the batch's content tokens."""

    def __init__(self, reference, cfg):
        self.reference, self.cfg = reference, cfg
        layers, self.routers = _reference_modules(reference, cfg)
        self._content = None
        self._hidden, self._logits, self._ids = {}, {}, {}
        self._hooks = [layer.register_forward_hook(self._on_layer(i)) for i, layer in enumerate(layers)]
        self._hooks += [router.register_forward_hook(self._on_router(j))
                        for j, router in enumerate(self.routers[b] for b in cfg.moe_layers)]

    def rules(self) -> list[RouterRule]:
        """Each MoE layer's selection rule, with the reference's own correction bias (Nemotron-H)."""
        cfg = self.cfg
        if cfg.router_kind == "softmax":
            return [RouterRule("softmax", cfg.num_experts_per_tok) for _ in cfg.moe_layers]
        return [RouterRule("sigmoid", cfg.num_experts_per_tok, self.routers[b].e_score_correction_bias.double().numpy(),
                           *cfg.router_groups) for b in cfg.moe_layers]

    def _on_layer(self, index: int):
        def hook(_module, _inputs, output):
            self._hidden[index] = (output[0] if isinstance(output, tuple) else output).float().numpy()[self._content]
        return hook

    def _on_router(self, j: int):
        def hook(_module, _inputs, output):
            logits_ne, _weights, ids_nk = output
            flat = self._content.reshape(-1)
            self._logits[j] = logits_ne.float().numpy()[flat]
            self._ids[j] = ids_nk.numpy()[flat]
        return hook

    def run(self, ids: np.ndarray, mask: np.ndarray) -> Outputs:
        import torch  # the test extra: every other command runs without PyTorch

        self._content = mask.astype(bool)
        self._hidden, self._logits, self._ids = {}, {}, {}
        with torch.no_grad():
            logits = self.reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        blocks, moe = len(self.cfg.layer_kinds), len(self.cfg.moe_layers)
        return Outputs(logits.float().numpy()[self._content], [self._hidden[i] for i in range(blocks)],
                       [self._logits[j] for j in range(moe)], [self._ids[j] for j in range(moe)])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def moejax_outputs(out, content: np.ndarray) -> Outputs:
    """A moejax CausalLMOutput's first len(content) rows, content tokens only."""
    rows = len(content)

    def take(a):
        return np.asarray(a[:rows])[content]

    return Outputs(take(out.logits).astype(np.float32), [take(h).astype(np.float32) for h in out.hidden_states],
                   [take(r) for r in out.router_logits], [take(i) for i in out.router_expert_ids])


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class ParityResult:
    passed: bool
    summary: dict
    layers: list[dict]
    out: Path | None


@dataclasses.dataclass
class _Batch:
    groups_n: np.ndarray  # per content token, its sequence's group
    ids: np.ndarray  # [b, t]
    mask: np.ndarray  # [b, t]
    first_sequence: int  # the index of its first sequence


@dataclasses.dataclass(frozen=True)
class ParitySettings:
    """Everything `moejax parity` takes."""

    model: Path | None = option(None, "Hugging Face checkpoint directory (config.json, safetensors, tokenizer); "
                                "qwen3_moe or nemotron_h", kind=Path, metavar="DIR")
    text: Path | None = option(None, "a UTF-8 text file, tokenised and cut into --seq-len sequences (instead of "
                               "--data)", kind=Path, metavar="FILE")
    langs: tuple[str, ...] = option(("en", "he", "ja"), "with --data (or the built-in sample): comma-separated "
                                    "language codes, each given an equal share of --max-tokens", kind=list)
    data: str | None = option(None, "a parallel corpus as for `moejax analyze` (FLORES-200 directory, TSV, JSONL or "
                              "{lang}.txt files); default, without --text: the built-in sample", metavar="CORPUS")
    dtype: str = option("auto", "moejax's parameter and compute dtype; auto: the checkpoint's (config.json dtype). "
                        "float32 gives the float32 verdict (recommended); bfloat16/float16 the calibrated 16-bit one "
                        "(docs/parity.md)", choices=("auto", *DTYPES))
    reference_dtype: str = option("auto", "the 16-bit dtype transformers also runs in for a calibrated verdict "
                                  "(auto: moejax's); the reference always runs in float32 too",
                                  choices=("auto", *DTYPES))
    seq_len: int = option(512, "tokens per sequence at most", kind=int, minimum=1)
    batch_size: int = option(4, "sequences per forward pass", kind=int, minimum=1)
    max_tokens: int = option(4096, "tokens compared in all", kind=int, minimum=1)
    tol: tuple[str, ...] = option((), "override one tolerance (repeatable), e.g. --tol kl_mean=1e-3; names: "
                                  + ", ".join(f.name for f in dataclasses.fields(Tolerances)),
                                  metavar="NAME=VALUE", repeat=True)
    list_tolerances: bool = option(False, "print the default tolerances of each verdict and exit", kind=bool)
    dt_floor: str = option("time_step_min", "Nemotron-H only: where moejax floors the Mamba-2 dt; time_step_min is "
                           "what transformers' PyTorch path does (moejax's own default is time_step_limit)",
                           choices=("time_step_min", "time_step_limit"))
    skip_incomplete: bool = option(False, "with --data: drop the corpus rows where a language's cell is empty "
                                   "instead of stopping at the first", kind=bool)
    allow_nonfinite: bool = option(False, "load a checkpoint holding NaN or infinite weights (the comparison then "
                                   "reports NaN and fails) instead of refusing it", kind=bool)
    mesh: str | None = option(None, MESH_HELP + "; the reference stays on the CPU", metavar="AXIS=N,...")
    out: Path | None = option(Path("moejax-parity"), "output directory (replaced only when the run succeeds); None "
                              "from Python: write nothing", kind=Path)
    quiet: bool = option(False, "no progress output", kind=bool)

    def __post_init__(self):
        check_options(self)
        if self.text is not None and self.data is not None:
            raise SettingsError("--text and --data are alternatives: give one")
        if self.model is None and not self.list_tolerances:
            raise SettingsError("--model DIR is required")
        self.tolerances  # noqa: B018 (checks the overrides)

    @property
    def tolerances(self) -> dict[str, float]:
        """The --tol overrides as {name: value}."""
        fields = {f.name for f in dataclasses.fields(Tolerances)}
        overrides = {}
        for item in self.tol:
            key, sep, value = item.partition("=")
            if not sep:
                raise SettingsError(f"--tol {item!r}: expected NAME=VALUE, e.g. kl_mean=1e-3")
            if key not in fields:
                raise SettingsError(f"--tol {item!r}: unknown tolerance {key!r}; known: {sorted(fields)}")
            try:
                overrides[key] = float(value)
            except ValueError:
                raise SettingsError(f"--tol {item!r}: {value!r} is not a number") from None
            if not math.isfinite(overrides[key]) or overrides[key] < 0:
                raise SettingsError(f"--tol {item!r}: a tolerance must be a finite number >= 0")
        return overrides


def tolerance_listing() -> str:
    """The default tolerances of each verdict, one line each (`--list-tolerances`)."""
    return "\n".join(name + " " + " ".join(f"{k}={format(v, 'g')}" for k, v in vars(bounds).items() if v is not None)
                     for name, bounds in TOLERANCES.items())


def parity(settings: ParitySettings) -> ParityResult:
    """Runs the comparison; writes summary.json, layers.csv, groups.csv, flips.csv and drift_per_layer.png to OUT.

    The text: a UTF-8 file cut into seq_len-token sequences; otherwise a parallel corpus (default the built-in
    sample) in `langs`. dtype: moejax's ("auto": the checkpoint's); float32 gives the float32 verdict, bfloat16 or
    float16 the calibrated one, where reference_dtype ("auto": moejax's) is the 16-bit dtype the reference also
    runs in. dt_floor (Nemotron-H): "time_step_min" reproduces transformers' PyTorch path.
    """
    s = settings
    started = time.perf_counter()
    model_dir, out, text, data = Path(s.model), s.out, s.text, s.data
    inputs = [model_dir, text, data]
    if out is not None:
        check_output(out, "parity", inputs)  # before any work: nothing of the user's is replaced
    seq_len, batch_size, show_progress = s.seq_len, s.batch_size, not s.quiet
    mesh = make_mesh(s.mesh) if s.mesh else None
    if jax.process_count() > 1:
        raise SettingsError("moejax parity runs in one process (the PyTorch reference is on one host); run it on one "
                            "worker, with a mesh over that worker's devices")
    cfg = load_config(model_dir)  # an unknown architecture stops here, before anything loads
    dtype = checkpoint_dtype(model_dir) if s.dtype == "auto" else s.dtype
    mode = "float32" if dtype == "float32" else "calibrated"
    if mode == "float32" and s.reference_dtype not in ("auto", "float32"):
        raise SettingsError(f"--reference-dtype {s.reference_dtype} with a float32 moejax run: the float32 verdict "
                            "compares float32 with float32; leave --reference-dtype out, or give --dtype bfloat16 for "
                            "the calibrated 16-bit verdict")
    calibration_dtype = None
    if mode == "calibrated":
        calibration_dtype = dtype if s.reference_dtype == "auto" else s.reference_dtype
        if calibration_dtype == "float32":
            raise SettingsError(f"--reference-dtype float32 with --dtype {dtype}: the 16-bit verdict runs the "
                                "reference in float32 and in a 16-bit dtype (its own rounding is the yardstick); "
                                "leave --reference-dtype out or give bfloat16/float16")
    bounds = tolerances_for(mode, s.tolerances)
    tokenizer = HFTokenizer(model_dir)
    langs = list(s.langs)
    sequences = (text_sequences(text, tokenizer, seq_len, s.max_tokens) if text is not None
                 else corpus_sequences(data, langs, tokenizer, seq_len, s.max_tokens, s.skip_incomplete))
    if not sequences:
        raise DataError(f"{text or data or 'the sample corpus'}: no tokens to compare")
    too_big = [i for seq in sequences for i in seq.ids if not 0 <= i < cfg.vocab_size]
    if too_big:
        raise DataError(f"the tokenizer in {model_dir} gives token id {too_big[0]}, outside the model's vocabulary "
                        f"of {cfg.vocab_size} ({model_dir / 'config.json'}): the tokenizer does not belong to the "
                        "model")
    all_batches = [_Batch(np.repeat(np.array(groups), mask.sum(-1)), ids, mask, i * batch_size)
                   for i, (groups, ids, mask) in enumerate(batches(sequences, batch_size, tokenizer.pad_id))]

    def say(message):
        if show_progress:
            print(message, file=sys.stderr, flush=True)

    timings = dict.fromkeys(("moejax_forward_s", "moejax_first_batch_s", "moejax_wait_s", "reference_forward_s",
                             "compare_s"), 0.0)
    timings["moejax_reruns"] = 0
    where = f"mesh {describe(mesh)}" if mesh is not None else "one device"
    say(f"loading {model_dir} in moejax ({dtype}, JAX backend {jax.default_backend()}, {where})")
    t0 = time.perf_counter()
    overrides = {"dt_floor": s.dt_floor} if "dt_floor" in {f.name for f in dataclasses.fields(cfg)} else {}
    model = from_pretrained(model_dir, dtype=DTYPES[dtype], mesh=mesh, allow_nonfinite=s.allow_nonfinite, **overrides)
    timings["moejax_load_s"] = time.perf_counter() - t0
    width = all_batches[0].ids.shape[1]
    no_forcing = ForcedRouting.none(len(cfg.moe_layers), batch_size, width, cfg.num_experts_per_tok)

    def run_moejax(number: int, forced: ForcedRouting = no_forcing) -> Outputs:
        """Batch `number` through moejax (always with a ForcedRouting, so forcing never recompiles)."""
        start = time.perf_counter()
        b = all_batches[number]
        ids, mask = _fill_rows(b.ids, b.mask, batch_size)
        result = jax.block_until_ready(model(ids, mask, return_router_logits=True, return_hidden_states=True,
                                             forced_routing=forced))
        timings["moejax_forward_s"] += time.perf_counter() - start
        timings["moejax_first_batch_s"] = timings["moejax_first_batch_s"] or time.perf_counter() - start
        return moejax_outputs(result, b.mask.astype(bool))

    # moejax compiles and runs the first batch while transformers loads. On an accelerator it also runs each next
    # batch while the reference runs the current one; on the CPU the two would only compete for the same cores.
    ahead = jax.default_backend() != "cpu"
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moejax")
    moejax_side, reference_side = SideTally(cfg), (SideTally(cfg) if mode == "calibrated" else None)
    flip_rows: list[dict] = []
    recorder = bar = None
    total_tokens = sum(len(s.ids) for s in sequences)
    try:
        pending = worker.submit(run_moejax, 0)
        say(f"loading {model_dir} in transformers float32 (PyTorch, CPU)")
        t0 = time.perf_counter()
        recorder = Recorder(load_reference(model_dir, "float32", quiet=not show_progress), cfg)
        timings["reference_load_s"] = time.perf_counter() - t0
        rules = recorder.rules()
        truths = []
        bar = tqdm(total=total_tokens, desc="parity" if mode == "float32" else "reference float32", unit="tok",
                   disable=not show_progress)
        for number, b in enumerate(all_batches):
            t0 = time.perf_counter()
            truth = recorder.run(b.ids, b.mask)
            timings["reference_forward_s"] += time.perf_counter() - t0
            if mode == "calibrated":
                truths.append(truth)
            else:
                t0 = time.perf_counter()
                got = pending.result()
                timings["moejax_wait_s"] += time.perf_counter() - t0
                if number + 1 < len(all_batches):
                    pending = worker.submit(run_moejax, number + 1) if ahead else None
                t0 = time.perf_counter()
                flip_rows += _compare_float32(cfg, rules, bounds, b, truth, got, moejax_side, number, no_forcing,
                                              lambda forced, number=number: run_moejax(number, forced), timings)
                timings["compare_s"] += time.perf_counter() - t0
                if not ahead and number + 1 < len(all_batches):
                    pending = worker.submit(run_moejax, number + 1)
                bar.set_postfix(kl_mean=f"{np.concatenate(moejax_side.kl_n).mean():.2e}")
            bar.update(int(b.mask.sum()))
        bar.close()
        if mode == "calibrated":
            recorder.close()
            recorder = None
            gc.collect()
            say(f"loading {model_dir} in transformers {calibration_dtype} (PyTorch, CPU): the yardstick")
            t0 = time.perf_counter()
            recorder = Recorder(load_reference(model_dir, calibration_dtype, quiet=not show_progress), cfg)
            timings["reference_load_s"] += time.perf_counter() - t0
            bar = tqdm(total=total_tokens, desc=f"parity {dtype}", unit="tok", disable=not show_progress)
            for number, b in enumerate(all_batches):
                got = pending.result() if number == 0 else run_moejax(number)
                t0 = time.perf_counter()
                calibration = recorder.run(b.ids, b.mask)
                timings["reference_forward_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                for side, outputs in ((moejax_side, got), (reference_side, calibration)):
                    flips = _compare_calibrated(cfg, rules, b, truths[number], outputs, side, number)
                    if side is moejax_side:
                        flip_rows += flips
                timings["compare_s"] += time.perf_counter() - t0
                bar.update(int(b.mask.sum()))
    finally:
        if bar is not None:
            bar.close()
        worker.shutdown(cancel_futures=True)
        if recorder is not None:
            recorder.close()

    k = cfg.num_experts_per_tok
    layer_rows = _layer_rows(cfg, moejax_side, reference_side, bounds, calibration_dtype)
    group_rows = _group_rows(moejax_side, reference_side)
    checks = (_checks_float32(bounds, group_rows[0], layer_rows) if mode == "float32"
              else _checks_calibrated(bounds, UNIT_ROUNDOFF[calibration_dtype], group_rows[0], layer_rows))
    passed = all(c["passed"] for c in checks)
    drift = next((r for r in layer_rows if not r["hidden_checked"] <= r["hidden_bound"]), None)
    routing = moejax_side.routing
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "verdict": "pass" if passed else "fail", "mode": mode,
        "model": str(model_dir), "model_type": cfg.model_type, "dtype": dtype, "reference_dtype": "float32",
        "calibration_dtype": calibration_dtype, "jax_backend": jax.default_backend(), "mesh": where,
        "tokens": int(total_tokens), "tokens_compared": min(r.tokens for r in moejax_side.blocks),
        "sequences": len(sequences), "seq_len": seq_len, "batch_size": batch_size, "top_k": k,
        "ties": sum(r.ties for r in routing), "exact_ties": sum(r.exact_ties for r in routing),
        "other_flips": sum(r.other_flips for r in routing), "forced_tokens": sum(r.forced for r in routing),
        "flips": len(flip_rows),
        "source": str(text) if text is not None else (data or "builtin sample corpus"),
        "dt_floor": overrides.get("dt_floor"),
        "overall": group_rows[0], "groups": group_rows[1:], "checks": checks,
        "tolerances": dataclasses.asdict(bounds),
        "first_drift_block": None if drift is None else {
            "block": drift["block"], "kind": drift["kind"], "hidden_relative_diff": drift["hidden_checked"],
            "bound": drift["hidden_bound"]},
        "timings": timings,
    }
    if out is not None:
        out = _write(out, inputs, summary, layer_rows, group_rows, flip_rows)
    return ParityResult(passed=passed, summary=summary, layers=layer_rows, out=None if out is None else Path(out))


def _flip_rows(flips, b: _Batch, number: int, layer: int, block: int, forced: bool, truth: Outputs,
               got: Outputs, j: int) -> list[dict]:
    """flips.csv rows: where each flip is (sequence, position, token), the two expert sets and its classification."""
    rows_b, cols_t = np.nonzero(b.mask.astype(bool))
    out = []
    for i, t in enumerate(flips.token):
        out.append({"moe_layer": layer, "block": block, "group": b.groups_n[t], "batch": number,
                    "sequence": b.first_sequence + int(rows_b[t]), "position": int(cols_t[t]),
                    "token_id": int(b.ids[rows_b[t], cols_t[t]]),
                    "reference_experts": " ".join(map(str, sorted(truth.router_ids[j][t].tolist()))),
                    "moejax_experts": " ".join(map(str, sorted(got.router_ids[j][t].tolist()))),
                    "kind": flips.kind[i], "score_gap": float(flips.gap[i]), "window": float(flips.window[i]),
                    "boundary_score": float(flips.boundary[i]), "router_logit_diff": float(flips.logit_diff[i]),
                    "forced": forced and flips.kind[i] != OTHER})
    return out


def _compare_float32(cfg, rules, bounds, b: _Batch, truth: Outputs, got: Outputs, side: SideTally, number: int,
                     blank: ForcedRouting, rerun: Callable[[ForcedRouting], Outputs], timings: dict) -> list[dict]:
    """Block by block in order: at each MoE layer the flips are classified, the proven ties forced into moejax's
    routing (and moejax run again from its current forcing), then the block's output compared; every content
    token is compared at every block."""
    moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
    rows_b, cols_t = np.nonzero(b.mask.astype(bool))
    forced = None
    flip_rows = []
    for block in range(len(cfg.layer_kinds)):
        j = moe_index.get(block)
        if j is not None:
            flips = classify_flips(rules[j], truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                                   got.router_ids[j], _or_inf(bounds.router_logit_max_abs))
            side.routing[j].add(b.groups_n, truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                                got.router_ids[j], flips)
            flip_rows += _flip_rows(flips, b, number, j, block, True, truth, got, j)
            ties = flips.token[flips.ties]
            if len(ties):
                if forced is None:
                    forced = ForcedRouting(np.array(blank.expert_ids), np.array(blank.mask))
                forced.mask[j, rows_b[ties], cols_t[ties]] = True
                forced.expert_ids[j, rows_b[ties], cols_t[ties]] = truth.router_ids[j][ties]
                side.routing[j].forced += len(ties)
                got = rerun(forced)
                timings["moejax_reruns"] += 1
        side.blocks[block].add(truth.hidden[block], got.hidden[block])
    side.add_tokens(b.groups_n, truth, got)
    return flip_rows


def _compare_calibrated(cfg, rules, b: _Batch, truth: Outputs, got: Outputs, side: SideTally,
                        number: int) -> list[dict]:
    """One 16-bit side (moejax, or the reference in 16 bits) against the float32 reference, every content token;
    its flips are listed (with the reference's score gap) but not classified: 16-bit rounding moves router
    logits by far more than a float32 window."""
    flip_rows = []
    for block in range(len(cfg.layer_kinds)):
        side.blocks[block].add(truth.hidden[block], got.hidden[block])
    for j, block in enumerate(cfg.moe_layers):
        side.routing[j].add(b.groups_n, truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                            got.router_ids[j])
        flips = classify_flips(rules[j], truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                               got.router_ids[j])
        flips.kind[:] = "16-bit"
        flip_rows += _flip_rows(flips, b, number, j, block, False, truth, got, j)
    side.add_tokens(b.groups_n, truth, got)
    return flip_rows


def _or_inf(bound: float | None) -> float:
    return np.inf if bound is None else bound


def _layer_rows(cfg, side: SideTally, reference: SideTally | None, bounds: Tolerances,
                calibration_dtype: str | None) -> list[dict]:
    """layers.csv: per block, moejax's hidden-state difference and per MoE layer its routing figures; calibrated,
    also the 16-bit reference's and the bounds they give. `hidden_checked` is the figure checked against
    `hidden_bound`: the relative difference over all entries (float32), or the median of the tokens' own
    relative differences (calibrated: robust to the few tokens a 16-bit routing flip moves a lot)."""
    rows = []
    moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
    k = cfg.num_experts_per_tok
    m = bounds.calibration_multiple
    floor = UNIT_ROUNDOFF.get(calibration_dtype, 0.0)
    for block, kind in enumerate(cfg.layer_kinds):
        tally = side.blocks[block]
        row = {"block": block, "kind": kind, "tokens_compared": tally.tokens,
               "hidden_relative_diff": tally.relative, "hidden_max_abs_diff": tally.max_abs,
               "hidden_median": tally.quantile(0.5), "hidden_p90": tally.quantile(0.9)}
        if reference is None:
            row |= {"hidden_checked": tally.relative, "hidden_bound": _or_inf(bounds.hidden_relative)}
        else:
            theirs = reference.blocks[block]
            row |= {"hidden_relative_diff_reference": theirs.relative, "hidden_median_reference": theirs.quantile(0.5),
                    "hidden_p90_reference": theirs.quantile(0.9), "hidden_checked": tally.quantile(0.5),
                    "hidden_bound": _or_inf(m) * max(theirs.quantile(0.5), floor)}
        if block in moe_index:
            j = moe_index[block]
            r = side.routing[j]
            f_ref, f_got = M.usage_fractions(r.counts_ref, k), M.usage_fractions(r.counts_got, k)
            row |= {"moe_layer": j, "router_logit_max_abs_diff": r.max_abs,
                    "router_logit_mean_abs_diff": r.sum_abs / max(r.entries, 1),
                    "router_logit_relative_diff": _relative(r.sq_diff, r.sq_ref),
                    "router_logit_median_relative": r.median_relative(),
                    "expert_set_agreement": r.agreement(), "expert_jaccard_mean": r.jaccard_sum / max(r.total, 1)}
            if reference is None:
                row |= {"ties": r.ties, "exact_ties": r.exact_ties, "near_tie_rate": r.near_tie_rate,
                        "other_flips": r.other_flips, "forced_tokens": r.forced}
            else:
                theirs = reference.routing[j]
                row |= {"router_logit_median_relative_reference": theirs.median_relative(),
                        "router_logit_median_relative_bound": _or_inf(m) * max(theirs.median_relative(), floor),
                        "expert_set_agreement_reference": theirs.agreement(),
                        "expert_set_agreement_bound": 1 - _allowed_misses(m, theirs.misses) / max(r.total, 1)}
            row |= {"usage_entropy_bits_reference": float(M.usage_entropy_bits(f_ref)),
                    "usage_entropy_bits_moejax": float(M.usage_entropy_bits(f_got)),
                    "gini_reference": float(M.gini(r.counts_ref)), "gini_moejax": float(M.gini(r.counts_got))}
        rows.append(row)
    return rows


def _allowed_misses(m: float | None, reference_misses: int) -> float:
    """Tokens moejax may get wrong (another argmax, another expert set) where the 16-bit reference got
    `reference_misses` wrong: m times as many, plus three Poisson standard deviations (such misses are rare,
    discrete events, and a short run sees few of them)."""
    if m is None:
        return np.inf
    expected = m * max(reference_misses, 1)
    return expected + 3 * math.sqrt(expected)


def _token_figures(kl_n: np.ndarray, top1_n: np.ndarray) -> dict:
    nan = float("nan")
    return {"kl_mean": float(kl_n.mean()) if len(kl_n) else nan,
            "kl_median": float(np.median(kl_n)) if len(kl_n) else nan,
            "kl_p99": float(np.quantile(kl_n, 0.99)) if len(kl_n) else nan,
            "kl_max": float(kl_n.max()) if len(kl_n) else nan,
            "top1_agreement": float(top1_n.mean()) if len(kl_n) else nan}


def _group_rows(side: SideTally, reference: SideTally | None) -> list[dict]:
    """groups.csv: overall and per group, the token figures (and, calibrated, the 16-bit reference's) and the
    mean and worst expert-set agreement over the MoE layers."""
    kl_n, top1_n, group_n = side.per_token()
    theirs = reference.per_token() if reference is not None else None
    rows = []
    for group in [None, *dict.fromkeys(group_n)]:
        here = slice(None) if group is None else group_n == group
        row = {"group": group or "all", "tokens": int(len(kl_n[here]))} | _token_figures(kl_n[here], top1_n[here])
        if theirs is not None:
            figures = _token_figures(theirs[0][here], theirs[1][here])
            row |= {f"{name}_reference": value for name, value in figures.items()}
        if side.routing:
            agreements = [r.agreement(group) for r in side.routing]
            row |= {"expert_set_agreement_mean": float(np.mean(agreements)),
                    "expert_set_agreement_min": float(np.min(agreements))}
        rows.append(row)
    return rows


def _where(row: dict) -> str:
    return f" (block {row['block']}" + (f", MoE layer {row['moe_layer']})" if "moe_layer" in row else ")")


def _check(name: str, value: float, op: str, bound: float | None, what: str) -> dict:
    """A NaN value fails any bound."""
    passed = True if bound is None else bool(value >= bound if op == ">=" else value <= bound)
    return {"check": name, "value": value, "op": op, "tolerance": bound, "what": what, "passed": passed}


def _checks_float32(bounds: Tolerances, overall: dict, rows: list[dict]) -> list[dict]:
    """Each bounded figure against its tolerance; per-block and per-layer figures by their worst one."""
    moe = [r for r in rows if "moe_layer" in r]
    tokens = overall["tokens"]
    checks = [_check("kl_mean", overall["kl_mean"], "<=", bounds.kl_mean, "mean KL(reference || moejax), nats"),
              _check("kl_p99", overall["kl_p99"], "<=", bounds.kl_p99, "99th percentile of the per-token KL, nats"),
              _check("kl_max", overall["kl_max"], "<=", bounds.kl_max, "largest per-token KL, nats"),
              _check("top1_agreement", overall["top1_agreement"], ">=", bounds.top1_agreement,
                     "tokens with the same argmax")]
    worst = _worst(rows, "hidden_relative_diff")
    checks.append(_check("hidden_relative", worst["hidden_relative_diff"], "<=", bounds.hidden_relative,
                         "relative hidden-state difference, worst block" + _where(worst)))
    if moe:
        for name, column, op, what in (
                ("router_logit_max_abs", "router_logit_max_abs_diff", "<=", "largest |router logit difference|"),
                ("router_logit_relative", "router_logit_relative_diff", "<=", "relative router-logit difference"),
                ("expert_set_agreement", "expert_set_agreement", ">=",
                 "tokens with identical expert sets (ties count as different)")):
            row = _worst(moe, column, lowest=op == ">=")
            checks.append(_check(name, row[column], op, getattr(bounds, name),
                                 f"{what}, worst MoE layer{_where(row)}"))
        first = next((r for r in moe if r["other_flips"]), None)
        checks.append(_check("other_flips", sum(r["other_flips"] for r in moe), "<=", bounds.other_flips,
                             "routing flips that are not proven near ties, all MoE layers"
                             + ("" if first is None else f"; the first in{_where(first)}: {first['other_flips']}")))
        # A single near tie in a short run is not a rate: a layer fails with two or more beyond the bound.
        worst = _worst(moe, "near_tie_rate")
        allowed = None if bounds.tie_rate is None else max(bounds.tie_rate, 1 / max(tokens, 1))
        checks.append(_check("tie_rate", worst["near_tie_rate"], "<=", allowed,
                             f"near ties per token (not exact ties), worst MoE layer{_where(worst)}; "
                             f"{sum(r['ties'] for r in moe)} ties in all, forced and compared"))
    checks.append(_check("tokens_compared", min(r["tokens_compared"] for r in rows), ">=", tokens,
                         "content tokens compared at every block, of all"))
    return checks


def _checks_calibrated(bounds: Tolerances, unit: float, overall: dict, rows: list[dict]) -> list[dict]:
    """moejax's error against the float32 reference within calibration_multiple times the 16-bit reference's own:
    per block the median of the tokens' relative hidden-state differences, per MoE layer that of the router
    logits (each floored at the dtype's unit roundoff), and the median per-token KL, which grows as the square
    of a logit error, within the square of the multiple; misses (argmax, expert sets) within the multiple plus
    Poisson noise. Medians, because a 16-bit routing flip moves a few tokens a lot on either side, and which
    tokens flip is chance; an error in the implementation moves every token."""
    m = bounds.calibration_multiple
    tokens = overall["tokens"]
    ref_kl = overall["kl_median_reference"]
    checks = [_check("kl_median", overall["kl_median"], "<=", None if m is None else m * m * max(ref_kl, unit * unit),
                     f"median KL(float32 reference || moejax), nats (16-bit reference: {ref_kl:.3g})")]
    for name in ("kl_mean", "kl_p99"):
        checks.append(_check(name, overall[name], "<=", None, f"{name[3:]} KL (16-bit reference: "
                             f"{overall[name + '_reference']:.3g})"))
    ref_misses = round((1 - overall["top1_agreement_reference"]) * tokens)
    checks.append(_check("top1_agreement", overall["top1_agreement"], ">=",
                         1 - _allowed_misses(m, ref_misses) / max(tokens, 1),
                         f"tokens with the float32 reference's argmax (16-bit reference: "
                         f"{overall['top1_agreement_reference']:.4f})"))
    worst = max(rows, key=lambda r: _ratio(r["hidden_checked"], r["hidden_bound"]))
    checks.append(_check("hidden_relative", worst["hidden_checked"], "<=", None if m is None else worst["hidden_bound"],
                         "median per-token relative hidden-state difference, worst block against its bound"
                         f"{_where(worst)} (16-bit reference: {worst['hidden_median_reference']:.3g})"))
    moe = [r for r in rows if "moe_layer" in r]
    if moe:
        worst = max(moe, key=lambda r: _ratio(r["router_logit_median_relative"],
                                              r["router_logit_median_relative_bound"]))
        checks.append(_check("router_logit_relative", worst["router_logit_median_relative"], "<=",
                             None if m is None else worst["router_logit_median_relative_bound"],
                             "median per-token relative router-logit difference, worst MoE layer" + _where(worst)
                             + f" (16-bit reference: {worst['router_logit_median_relative_reference']:.3g})"))
        worst = max(moe, key=lambda r: _ratio(1 - r["expert_set_agreement"], 1 - r["expert_set_agreement_bound"]))
        checks.append(_check("expert_set_agreement", worst["expert_set_agreement"], ">=",
                             None if m is None else worst["expert_set_agreement_bound"],
                             f"tokens with the float32 reference's expert set, worst MoE layer{_where(worst)} "
                             f"(16-bit reference: {worst['expert_set_agreement_reference']:.4f})"))
    checks.append(_check("tokens_compared", min(r["tokens_compared"] for r in rows), ">=", tokens,
                         "content tokens compared at every block, of all"))
    return checks


def _ratio(value: float, bound: float) -> float:
    """value / bound, NaN as the worst."""
    return np.inf if np.isnan(value) else value / max(bound, 1e-300)


def _json_safe(value):
    """NaN and infinities as strings ("NaN", "Infinity", "-Infinity"), so the JSON written stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write(out, inputs, summary, layer_rows, group_rows, flip_rows) -> Path:
    summary = summary | {"versions": versions("torch", "transformers")}
    with output_directory(out, "parity", inputs) as tmp:
        write_csv(tmp / "layers.csv", layer_rows)
        write_csv(tmp / "groups.csv", group_rows)
        write_csv(tmp / "flips.csv", flip_rows, columns=FLIP_COLUMNS)
        (tmp / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
        drift_figure(tmp / "drift_per_layer.png", layer_rows, summary["model"])
    return Path(out)


FLIP_COLUMNS = ("moe_layer", "block", "group", "batch", "sequence", "position", "token_id", "reference_experts",
                "moejax_experts", "kind", "score_gap", "window", "boundary_score", "router_logit_diff", "forced")


def verdict_text(result: ParityResult) -> str:
    """A few lines for the terminal: the checks, the flips, where drift starts, and the verdict."""
    s = result.summary
    against = ("transformers float32" if s["mode"] == "float32" else
               f"transformers float32, calibrated by transformers {s['calibration_dtype']}")
    lines = [f"moejax parity: {s['model']} ({s['model_type']}), moejax {s['dtype']} on {s['jax_backend']} vs "
             f"{against}, {s['tokens']} tokens"]
    for c in s["checks"]:
        mark = "    " if c["tolerance"] is None else "ok  " if c["passed"] else "FAIL"
        bound = "(not checked)" if c["tolerance"] is None else f"{c['op']} {c['tolerance']:<10.3g}"
        lines.append(f"  {mark} {c['check']:<22} {c['value']:<10.3g} {bound:<13} {c['what']}")
    for g in s["groups"]:
        extra = (f", expert sets {g['expert_set_agreement_mean']:.2%} (worst layer {g['expert_set_agreement_min']:.2%})"
                 if "expert_set_agreement_mean" in g else "")
        lines.append(f"  {g['group']}: {g['tokens']} tokens, KL mean {g['kl_mean']:.3g}, "
                     f"top-1 {g['top1_agreement']:.2%}{extra}")
    if s["mode"] == "float32" and s["flips"]:
        lines.append(f"  routing flips: {s['ties']} proven near ties ({s['exact_ties']} exact), forced into moejax's "
                     f"routing and compared ({s['forced_tokens']} tokens); {s['other_flips']} not explained by a tie"
                     + (" (see flips.csv)" if result.out else ""))
    drift = s["first_drift_block"]
    if drift:
        lines.append(f"  drift starts at block {drift['block']} ({drift['kind']}): hidden states "
                     f"{drift['hidden_relative_diff']:.3g} relative (bound {drift['bound']:.3g})")
    t = s["timings"]
    lines.append(f"  time: moejax {t['moejax_forward_s']:.1f} s (first batch, with compile, "
                 f"{t['moejax_first_batch_s']:.1f} s; {t['moejax_reruns']} reruns with forced ties), transformers "
                 f"{t['reference_forward_s']:.1f} s, comparison {t['compare_s']:.1f} s, total {t['total_s']:.1f} s")
    lines.append(f"verdict: {'PASS' if result.passed else 'FAIL'}" + (f" (wrote {result.out})" if result.out else ""))
    return "\n".join(lines)
