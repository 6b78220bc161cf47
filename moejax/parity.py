"""`moejax parity`: one checkpoint run by moejax and by transformers (PyTorch, CPU) on the same tokens, compared
per token, per block and per MoE layer, with a verdict against stated tolerances.

The PyTorch side runs under torch.no_grad in the checkpoint's dtype. Forward hooks on its decoder
layers and routers compare each layer's output with moejax's as it is produced and keep only running
sums, so it never holds more than one layer's activations beyond what its forward pass itself needs.
moejax runs first on each batch (one jitted call returning logits, router outputs and every block's
output, left on the device); each hook pulls the one moejax layer it compares.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ConfigError, read_config_json
from moejax.data.corpus import CorpusError, chunk, read_corpus
from moejax.parallel.mesh import describe
from moejax.routing import metrics as M


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The bounds `moejax parity` checks (KL in nats; agreements as fractions of content tokens). None: the
    figure is reported but not checked."""

    kl_mean: float | None  # mean over tokens of KL(reference || moejax), at most
    kl_p99: float | None  # the 99th percentile of the per-token KL, at most
    kl_max: float | None  # the largest per-token KL, at most
    top1_agreement: float | None  # tokens whose argmax token is the same, at least
    expert_set_agreement: float | None  # per MoE layer, tokens routed to the same set of experts, at least
    router_logit_max_abs: float | None  # per MoE layer, the largest |router logit difference|, at most
    router_logit_relative: float | None  # per MoE layer, ||logits_moejax - logits_ref|| / ||logits_ref||, at most
    hidden_relative: float | None  # per block, ||h_moejax - h_ref|| / ||h_ref|| over content tokens, at most


# float32: both sides compute the same function in float32; what is left is summation order, ~1e-6
# relative per layer. Observed on the tiny and bench models: KL ~1e-11, router logits ~1e-6, hidden
# states ~1e-7 relative. The bounds leave two to three orders of magnitude for a 48-layer model and
# fail on any real difference (a wrong norm, a missing bias: hidden states off by > 1e-2).
#
# bfloat16 (either side in 16 bits): each side rounds to 8 mantissa bits (2^-9 ~ 2e-3 relative) at
# different places (fused vs unfused ops, float32 vs bfloat16 accumulation), so the two are two
# independent bf16 approximations of the float32 function. Their gap is that of bf16 against float32,
# doubled: measured on the bench-size models (8-10 blocks, 64 experts), mean KL 1e-4 - 1e-3, hidden
# states 1-3% relative, 5-10% of tokens changing one expert where two router scores are within bf16
# rounding of each other. The bounds sit above that with margin for a 48-layer model, and below what
# a real bug gives (mean KL > 0.05, hidden states > 20% off, expert agreement < 50%).
TOLERANCES = {
    "float32": Tolerances(kl_mean=1e-6, kl_p99=1e-5, kl_max=1e-4, top1_agreement=0.999,
                          expert_set_agreement=0.99, router_logit_max_abs=1e-3, router_logit_relative=1e-4,
                          hidden_relative=1e-4),
    "bfloat16": Tolerances(kl_mean=1e-2, kl_p99=0.1, kl_max=None, top1_agreement=0.90,
                           expert_set_agreement=0.75, router_logit_max_abs=None, router_logit_relative=0.1,
                           hidden_relative=0.1),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def tolerances_for(dtype: str, reference_dtype: str, overrides: dict[str, float] | None = None) -> Tolerances:
    """The default bounds for the less precise side's dtype, with `overrides` (field name -> value)."""
    base = TOLERANCES["float32" if dtype == reference_dtype == "float32" else "bfloat16"]
    fields = {f.name for f in dataclasses.fields(Tolerances)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown tolerance(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(base, **(overrides or {}))


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
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise CorpusError(f"{path}: no text")
    return _cut("text", paragraphs, tokenizer, seq_len, max_tokens)


def corpus_sequences(data: str | None, langs: list[str], tokenizer, seq_len: int,
                     max_tokens: int) -> list[Sequence]:
    """Each language's paragraph chunks of a parallel corpus, joined and cut into seq_len-token sequences,
    max_tokens / len(langs) tokens per language (from the same sentences in every language)."""
    corpus = chunk(read_corpus(data, langs), 300, "paragraph")
    budget = max_tokens // len(langs)
    if budget < 1:
        raise ValueError(f"--max-tokens {max_tokens} leaves no tokens for {len(langs)} languages")
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
class BlockTally:
    """Running sums for one block's output over the tokens compared."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    tokens: int = 0

    def add(self, ref_nd: np.ndarray, got_nd: np.ndarray) -> None:
        self.tokens += len(ref_nd)
        diff = got_nd.astype(np.float64) - ref_nd
        self.sq_diff += float((diff ** 2).sum())
        self.sq_ref += float((ref_nd.astype(np.float64) ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))

    @property
    def relative(self) -> float:
        return (self.sq_diff / self.sq_ref) ** 0.5 if self.sq_ref > 0 else 0.0


@dataclasses.dataclass
class RouterTally:
    """Running sums for one MoE layer. Expert sets, Jaccard and top-K counts over every content token (per
    group too); router-logit differences and flips over the tokens still compared (not after a near tie)."""

    experts: int
    max_abs: float = 0.0
    sum_abs: float = 0.0
    entries: int = 0
    sq_diff: float = 0.0
    sq_ref: float = 0.0
    compared: int = 0
    near_ties: int = 0
    other_flips: int = 0
    same_sets: dict = dataclasses.field(default_factory=dict)  # group -> tokens with identical sets
    jaccard_sum: float = 0.0
    tokens: dict = dataclasses.field(default_factory=dict)  # group -> tokens
    counts_ref: np.ndarray = None
    counts_got: np.ndarray = None

    def __post_init__(self):
        self.counts_ref = np.zeros(self.experts, np.int64)
        self.counts_got = np.zeros(self.experts, np.int64)

    def add(self, groups_n: np.ndarray, compared_n: np.ndarray, logits_ref_ne, logits_got_ne, ids_ref_nk,
            ids_got_nk, tie_tolerance: float | None) -> np.ndarray:
        """Adds n content tokens (compared_n marks those not after a near tie); returns the near ties [n]:
        compared tokens routed to another expert set while their router logits agree within tie_tolerance."""
        diff_ne = np.abs(logits_got_ne.astype(np.float64) - logits_ref_ne)
        diff_ce = diff_ne[compared_n]
        self.max_abs = max(self.max_abs, float(diff_ce.max(initial=0.0)))
        self.sum_abs += float(diff_ce.sum())
        self.entries += diff_ce.size
        self.sq_diff += float((diff_ce ** 2).sum())
        self.sq_ref += float((logits_ref_ne[compared_n].astype(np.float64) ** 2).sum())
        ref_ne = _membership(ids_ref_nk, self.experts)
        got_ne = _membership(ids_got_nk, self.experts)
        shared_n = (ref_ne & got_ne).sum(-1)
        k = ids_ref_nk.shape[-1]
        same_n = shared_n == k
        within_n = diff_ne.max(-1, initial=0.0) <= (-1.0 if tie_tolerance is None else tie_tolerance)
        ties_n = compared_n & ~same_n & within_n
        self.compared += int(compared_n.sum())
        self.near_ties += int(ties_n.sum())
        self.other_flips += int((compared_n & ~same_n & ~within_n).sum())
        self.jaccard_sum += float((shared_n / (2 * k - shared_n)).sum())
        for group in np.unique(groups_n):
            here = groups_n == group
            self.same_sets[group] = self.same_sets.get(group, 0) + int(same_n[here].sum())
            self.tokens[group] = self.tokens.get(group, 0) + int(here.sum())
        self.counts_ref += ref_ne.sum(0)
        self.counts_got += got_ne.sum(0)
        return ties_n

    def agreement(self, group: str | None = None) -> float:
        """Tokens with identical expert sets, over every content token (of `group`)."""
        if group is None:
            return sum(self.same_sets.values()) / max(sum(self.tokens.values()), 1)
        return self.same_sets.get(group, 0) / max(self.tokens.get(group, 0), 1)

    @property
    def agreement_beyond_ties(self) -> float:
        """Compared tokens whose expert sets are identical or differ only at a near tie."""
        return 1.0 - self.other_flips / max(self.compared, 1)


def _membership(ids_nk: np.ndarray, experts: int) -> np.ndarray:
    member = np.zeros((len(ids_nk), experts), bool)
    np.put_along_axis(member, np.asarray(ids_nk, np.int64), True, axis=-1)
    return member


# ---------------------------------------------------------------------------------------------- the run


def load_reference(model_dir: Path, dtype: str, quiet: bool = False):
    """transformers' model for the checkpoint, in `dtype`, on the CPU, in eval mode (no remote code)."""
    import torch
    import transformers

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
        raise ValueError(f"the reference has {len(layers)} decoder layers, moejax's config {len(cfg.layer_kinds)}")
    routers = {}
    for name, module in reference.named_modules():
        found = re.search(r"layers\.(\d+)\.", name)
        if found and type(module).__name__.lower().endswith("topkrouter"):
            routers[int(found.group(1))] = module
    if sorted(routers) != list(cfg.moe_layers):
        raise ValueError(f"the reference's routers sit in blocks {sorted(routers)}, moejax's MoE layers in "
                         f"{list(cfg.moe_layers)}")
    return list(layers), routers


class Comparison:
    """The running comparison: forward hooks on the reference's decoder layers and routers compare each
    layer's output with moejax's as the reference produces it, keeping only running sums."""

    def __init__(self, cfg, bounds: Tolerances):
        self.cfg, self.bounds = cfg, bounds
        self.moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
        self.experts = getattr(cfg, "num_experts", None) or cfg.n_routed_experts
        self.blocks = [BlockTally() for _ in cfg.layer_kinds]  # tokens compared
        self.blocks_all = [BlockTally() for _ in cfg.layer_kinds]  # every content token
        self.routing = [RouterTally(self.experts) for _ in cfg.moe_layers]
        self.kl_n, self.top1_n, self.group_n, self.compared_n = [], [], [], []
        self.seconds = 0.0  # spent comparing, inside the hooks included
        # The batch under way: moejax's outputs, content [b, t], groups per content token, and after_tie
        # [b, t]: True from a near-tie routing flip onwards in its row. Those positions carry the flip's
        # legitimate effect, so they are not compared from that layer on.
        self.batch = {}

    def attach(self, reference) -> list:
        """Registers the hooks on `reference`; returns their handles."""
        layers, routers = _reference_modules(reference, self.cfg)
        hooks = [layer.register_forward_hook(self._on_layer(i)) for i, layer in enumerate(layers)]
        return hooks + [router.register_forward_hook(self._on_router(block)) for block, router in routers.items()]

    def _on_layer(self, index: int):
        def hook(_module, _inputs, output):
            start = time.perf_counter()
            b = self.batch
            ref_btd = (output[0] if isinstance(output, tuple) else output).float().numpy()
            got_btd = np.asarray(b["out"].hidden_states[index][:len(ref_btd)], np.float32)
            compared_bt = b["content"] & ~b["after_tie"]
            self.blocks_all[index].add(ref_btd[b["content"]], got_btd[b["content"]])
            self.blocks[index].add(ref_btd[compared_bt], got_btd[compared_bt])
            self.seconds += time.perf_counter() - start
        return hook

    def _on_router(self, block: int):
        def hook(_module, _inputs, output):
            start = time.perf_counter()
            b, j = self.batch, self.moe_index[block]
            logits_ne, _weights, ids_nk = output
            content, rows = b["content"], len(b["content"])
            flat = content.reshape(-1)
            logits_got = np.asarray(b["out"].router_logits[j][:rows], np.float32).reshape(len(flat), -1)
            ids_got = np.asarray(b["out"].router_expert_ids[j][:rows]).reshape(len(flat), -1)
            ties_n = self.routing[j].add(b["groups"], ~b["after_tie"][content], logits_ne.float().numpy()[flat],
                                         logits_got[flat], ids_nk.numpy()[flat], ids_got[flat],
                                         self.bounds.router_logit_max_abs)
            tie_rows, tie_cols = (where[ties_n] for where in np.nonzero(content))
            for row, col in zip(tie_rows, tie_cols, strict=True):
                b["after_tie"][row, col:] = True
            self.seconds += time.perf_counter() - start
        return hook

    def start_batch(self, groups: list[str], mask: np.ndarray, out) -> None:
        """Before the reference runs a batch: moejax's output for it and its mask."""
        content = mask.astype(bool)
        self.batch = {"out": out, "content": content, "after_tie": np.zeros_like(content),
                      "groups": np.repeat(np.array(groups), mask.sum(-1))}

    def finish_batch(self, logits_ref_btv: np.ndarray) -> None:
        """After the reference ran it: the output distributions, per content token."""
        start = time.perf_counter()
        b = self.batch
        ref_nv = logits_ref_btv[b["content"]]
        got_nv = np.asarray(b["out"].logits[:len(logits_ref_btv)], np.float32)[b["content"]]
        self.kl_n.append(token_kl(ref_nv, got_nv))
        self.top1_n.append(ref_nv.argmax(-1) == got_nv.argmax(-1))
        self.group_n.append(b["groups"])
        self.compared_n.append(~b["after_tie"][b["content"]])
        self.batch = {}
        self.seconds += time.perf_counter() - start


@dataclasses.dataclass
class ParityResult:
    passed: bool
    summary: dict
    layers: list[dict]
    out: Path | None


def parity(model_dir: str | Path, out: str | Path | None = None, *, text: str | Path | None = None,
           langs: list[str] | None = None, data: str | None = None, dtype: str = "auto",
           reference_dtype: str = "auto", seq_len: int = 512, batch_size: int = 4, max_tokens: int = 4096,
           tolerances: dict[str, float] | None = None, dt_floor: str = "time_step_min",
           edit_model: Callable | None = None, show_progress: bool = True, mesh=None) -> ParityResult:
    """Runs the comparison; writes summary.json, layers.csv, groups.csv and drift_per_layer.png to `out`.

    text: a UTF-8 file cut into seq_len-token sequences; otherwise `data` (a parallel corpus, default
    the built-in sample) in `langs`. dtype / reference_dtype: "auto" is the checkpoint's. dt_floor
    (Nemotron-H): "time_step_min" reproduces transformers' PyTorch path (see README). edit_model is a
    test hook: called on the loaded moejax model before the run (e.g. to corrupt one parameter). mesh:
    moejax loads onto it and runs sharded.
    """
    import torch
    from tqdm import tqdm

    import moejax
    from moejax.data.tokenize import HFTokenizer

    started = time.perf_counter()
    model_dir = Path(model_dir)
    if text is not None and data is not None:
        raise ValueError("--text and --data are alternatives: give one")
    if seq_len < 1 or batch_size < 1 or max_tokens < 1:
        raise ValueError("--seq-len, --batch-size and --max-tokens must be positive")
    if jax.process_count() > 1:
        raise ValueError("moejax parity runs in one process (the PyTorch reference is on one host); run it on one "
                         "worker, with a mesh over that worker's devices")
    cfg = moejax.load_config(model_dir)  # an unknown architecture stops here, before anything loads
    dtype = checkpoint_dtype(model_dir) if dtype == "auto" else dtype
    reference_dtype = checkpoint_dtype(model_dir) if reference_dtype == "auto" else reference_dtype
    for name, value in (("--dtype", dtype), ("--reference-dtype", reference_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} {value!r} is not one of auto, {', '.join(DTYPES)}")
    bounds = tolerances_for(dtype, reference_dtype, tolerances)
    tokenizer = HFTokenizer(model_dir)
    langs = langs or ["en", "he", "ja"]
    sequences = (text_sequences(text, tokenizer, seq_len, max_tokens) if text is not None
                 else corpus_sequences(data, langs, tokenizer, seq_len, max_tokens))
    if not sequences:
        raise CorpusError(f"{text or data or 'the sample corpus'}: no tokens to compare")
    too_big = [i for s in sequences for i in s.ids if not 0 <= i < cfg.vocab_size]
    if too_big:
        raise ValueError(f"the tokenizer in {model_dir} gives token id {too_big[0]}, outside the model's vocabulary "
                         f"of {cfg.vocab_size}")
    all_batches = list(batches(sequences, batch_size, tokenizer.pad_id))

    def say(message):
        if show_progress:
            print(message, file=sys.stderr, flush=True)

    timings = dict.fromkeys(("moejax_forward_s", "moejax_first_batch_s", "moejax_wait_s", "reference_forward_s"),
                            0.0)
    where = f"mesh {describe(mesh)}" if mesh is not None else "one device"
    say(f"loading {model_dir} in moejax ({dtype}, JAX backend {jax.default_backend()}, {where})")
    t0 = time.perf_counter()
    overrides = {"dt_floor": dt_floor} if cfg.model_type == "nemotron_h" else {}
    model = moejax.from_pretrained(model_dir, dtype=DTYPES[dtype], mesh=mesh, **overrides)
    if edit_model is not None:
        edit_model(model)
    timings["moejax_load_s"] = time.perf_counter() - t0

    def run_moejax(number):
        """Batch `number` through moejax, to completion (in the worker thread)."""
        start = time.perf_counter()
        ids, mask = _fill_rows(*all_batches[number][1:], batch_size)
        out = jax.block_until_ready(model(ids, mask, return_router_logits=True, return_hidden_states=True))
        timings["moejax_forward_s"] += time.perf_counter() - start
        timings["moejax_first_batch_s"] = timings["moejax_first_batch_s"] or time.perf_counter() - start
        return out

    # moejax compiles and runs the first batch while transformers loads. On an accelerator it also runs
    # each next batch while transformers runs the current one, so the command takes about as long as
    # the slower side; on the CPU the two would only compete for the same cores, so they take turns.
    ahead = jax.default_backend() != "cpu"
    comparison = Comparison(cfg, bounds)
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moejax")
    hooks, bar = [], None
    try:
        pending = worker.submit(run_moejax, 0)
        say(f"loading {model_dir} in transformers {reference_dtype} (PyTorch, CPU)")
        t0 = time.perf_counter()
        reference = load_reference(model_dir, reference_dtype, quiet=not show_progress)
        timings["reference_load_s"] = time.perf_counter() - t0
        hooks = comparison.attach(reference)
        bar = tqdm(total=sum(len(s.ids) for s in sequences), desc="parity", unit="tok", disable=not show_progress)
        for number, (groups, ids, mask) in enumerate(all_batches):
            t0 = time.perf_counter()
            got = pending.result()
            timings["moejax_wait_s"] += time.perf_counter() - t0
            if ahead and number + 1 < len(all_batches):
                pending = worker.submit(run_moejax, number + 1)
            comparison.start_batch(groups, mask, got)
            in_hooks, t0 = comparison.seconds, time.perf_counter()
            with torch.no_grad():
                logits_ref = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            timings["reference_forward_s"] += time.perf_counter() - t0 - (comparison.seconds - in_hooks)
            comparison.finish_batch(logits_ref.float().numpy())
            if not ahead and number + 1 < len(all_batches):
                pending = worker.submit(run_moejax, number + 1)
            bar.update(int(mask.sum()))
            bar.set_postfix(kl_mean=f"{np.concatenate(comparison.kl_n).mean():.2e}")
    finally:
        if bar is not None:
            bar.close()
        worker.shutdown(cancel_futures=True)
        for hook in hooks:
            hook.remove()
    timings["compare_s"] = comparison.seconds

    kl_n, top1_n, group_n, compared_n = (np.concatenate(x) for x in (comparison.kl_n, comparison.top1_n,
                                                                      comparison.group_n, comparison.compared_n))
    routing = comparison.routing
    layer_rows = _layer_rows(cfg.layer_kinds, cfg.moe_layers, comparison.blocks, comparison.blocks_all, routing,
                             cfg.num_experts_per_tok)
    group_rows = [_group_row(g, kl_n[here], top1_n[here], compared_n[here], routing, g)
                  for g, here in [(None, slice(None))] + [(g, group_n == g) for g in dict.fromkeys(group_n)]]
    checks = _checks(bounds, group_rows[0], layer_rows)
    passed = all(c["passed"] for c in checks)
    drift = next((r for r in layer_rows if bounds.hidden_relative is not None
                  and not r["hidden_relative_diff"] <= bounds.hidden_relative), None)
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "verdict": "pass" if passed else "fail",
        "model": str(model_dir), "model_type": cfg.model_type, "dtype": dtype, "reference_dtype": reference_dtype,
        "jax_backend": jax.default_backend(), "mesh": where, "tokens": int(len(kl_n)), "sequences": len(sequences),
        "near_tie_flips": sum(r.near_ties for r in routing), "tokens_after_near_tie": int((~compared_n).sum()),
        "seq_len": seq_len, "batch_size": batch_size,
        "source": str(text) if text is not None else (data or "builtin sample corpus"),
        "dt_floor": dt_floor if cfg.model_type == "nemotron_h" else None,
        "overall": group_rows[0], "groups": group_rows[1:], "checks": checks,
        "tolerances": dataclasses.asdict(bounds),
        "first_drift_block": None if drift is None else {"block": drift["block"], "kind": drift["kind"],
                                                         "hidden_relative_diff": drift["hidden_relative_diff"]},
        "timings": timings,
    }
    if out is not None:
        out = _write(out, summary, layer_rows, group_rows, bounds)
    return ParityResult(passed=passed, summary=summary, layers=layer_rows, out=None if out is None else Path(out))


def _layer_rows(kinds, moe_layers, blocks, blocks_all, routing, k) -> list[dict]:
    rows = []
    moe_index = {block: j for j, block in enumerate(moe_layers)}
    for block, kind in enumerate(kinds):
        row = {"block": block, "kind": kind, "tokens_compared": blocks[block].tokens,
               "hidden_relative_diff": blocks[block].relative, "hidden_max_abs_diff": blocks[block].max_abs,
               "hidden_relative_diff_all_tokens": blocks_all[block].relative}
        if block in moe_index:
            r = routing[moe_index[block]]
            f_ref, f_got = M.usage_fractions(r.counts_ref, k), M.usage_fractions(r.counts_got, k)
            h_ref, h_got = float(M.usage_entropy_bits(f_ref)), float(M.usage_entropy_bits(f_got))
            g_ref, g_got = float(M.gini(r.counts_ref)), float(M.gini(r.counts_got))
            row |= {"moe_layer": moe_index[block], "router_logit_max_abs_diff": r.max_abs,
                    "router_logit_mean_abs_diff": r.sum_abs / max(r.entries, 1),
                    "router_logit_relative_diff": (r.sq_diff / r.sq_ref) ** 0.5 if r.sq_ref > 0 else 0.0,
                    "expert_set_agreement": r.agreement(),
                    "expert_jaccard_mean": r.jaccard_sum / max(sum(r.tokens.values()), 1),
                    "near_tie_flips": r.near_ties, "other_flips": r.other_flips,
                    "expert_set_agreement_beyond_ties": r.agreement_beyond_ties,
                    "usage_entropy_bits_reference": h_ref, "usage_entropy_bits_moejax": h_got,
                    "usage_entropy_bits_diff": h_got - h_ref, "gini_reference": g_ref, "gini_moejax": g_got,
                    "gini_diff": g_got - g_ref}
        rows.append(row)
    return rows


def _group_row(group, kl_n, top1_n, compared_n, routing, key) -> dict:
    """KL and top-1 over the compared tokens (all of them: the *_all_tokens columns); expert-set agreement
    over every token."""
    nan = float("nan")
    kl_c = kl_n[compared_n]
    row = {"group": group or "all", "tokens": int(len(kl_n)), "tokens_compared": int(compared_n.sum()),
           "kl_mean": float(kl_c.mean()) if len(kl_c) else nan, "kl_p99": float(np.quantile(kl_c, 0.99)) if len(kl_c)
           else nan, "kl_max": float(kl_c.max()) if len(kl_c) else nan,
           "top1_agreement": float(top1_n[compared_n].mean()) if len(kl_c) else nan,
           "kl_mean_all_tokens": float(kl_n.mean()), "top1_agreement_all_tokens": float(top1_n.mean())}
    if routing:
        agreements = [r.agreement(key) for r in routing]
        row |= {"expert_set_agreement_mean": float(np.mean(agreements)),
                "expert_set_agreement_min": float(np.min(agreements))}
    return row


def _checks(bounds: Tolerances, overall: dict, rows: list[dict]) -> list[dict]:
    """Each bounded figure against its tolerance; per-layer figures by their worst layer."""
    moe = [r for r in rows if "moe_layer" in r]

    def worst(rows, column, most=True):
        row = (max if most else min)(rows, key=lambda r: r[column])
        return row[column], f" (block {row['block']})"

    found = {"kl_mean": (overall["kl_mean"], "", "mean KL(reference || moejax), nats"),
             "kl_p99": (overall["kl_p99"], "", "99th percentile of the per-token KL, nats"),
             "kl_max": (overall["kl_max"], "", "largest per-token KL, nats"),
             "top1_agreement": (overall["top1_agreement"], "", "tokens with the same argmax"),
             "hidden_relative": (*worst(rows, "hidden_relative_diff"), "relative hidden-state difference, worst block")}
    if moe:
        found |= {"expert_set_agreement": (*worst(moe, "expert_set_agreement_beyond_ties", most=False),
                                           "tokens with identical expert sets or a near tie, worst MoE layer"),
                  "router_logit_max_abs": (*worst(moe, "router_logit_max_abs_diff"),
                                           "largest |router logit difference|"),
                  "router_logit_relative": (*worst(moe, "router_logit_relative_diff"),
                                            "relative router-logit difference, worst MoE layer")}
    checks = []
    for name, (value, where, what) in found.items():  # a NaN value (nothing left to compare) fails
        bound = getattr(bounds, name)
        at_least = name.endswith("agreement")
        checks.append({"check": name, "value": value, "op": ">=" if at_least else "<=", "tolerance": bound,
                       "what": what + where,
                       "passed": True if bound is None else bool(value >= bound if at_least else value <= bound)})
    return checks


def _write(out, summary, layer_rows, group_rows, bounds) -> Path:
    from moejax.report.figures import drift_figure
    from moejax.report.output import atomic_directory, versions, write_csv

    summary = summary | {"versions": versions("torch", "transformers")}
    with atomic_directory(out) as tmp:
        write_csv(tmp / "layers.csv", layer_rows)
        write_csv(tmp / "groups.csv", group_rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        drift_figure(tmp / "drift_per_layer.png", layer_rows, bounds.hidden_relative, summary["model"])
    return Path(out)


def verdict_text(result: ParityResult) -> str:
    """A few lines for the terminal: the checks, where drift starts, and the verdict."""
    s = result.summary
    lines = [f"moejax parity: {s['model']} ({s['model_type']}), moejax {s['dtype']} on {s['jax_backend']} vs "
             f"transformers {s['reference_dtype']}, {s['tokens']} tokens"]
    for c in s["checks"]:
        mark = "    " if c["tolerance"] is None else "ok  " if c["passed"] else "FAIL"
        bound = "(not checked)" if c["tolerance"] is None else f"{c['op']} {c['tolerance']:<10.3g}"
        lines.append(f"  {mark} {c['check']:<22} {c['value']:<10.3g} {bound:<13} {c['what']}")
    for g in s["groups"]:
        extra = (f", expert sets {g['expert_set_agreement_mean']:.2%} (worst layer {g['expert_set_agreement_min']:.2%})"
                 if "expert_set_agreement_mean" in g else "")
        lines.append(f"  {g['group']}: {g['tokens']} tokens, KL mean {g['kl_mean']:.3g}, "
                     f"top-1 {g['top1_agreement']:.2%}{extra}")
    if s["near_tie_flips"]:
        lines.append(f"  {s['near_tie_flips']} near-tie routing flip(s) (router logits within "
                     f"{s['tolerances']['router_logit_max_abs']:g}); the {s['tokens_after_near_tie']} token positions "
                     "from each onwards in its sequence are not compared (see README)")
    drift = s["first_drift_block"]
    if drift:
        lines.append(f"  drift starts at block {drift['block']} ({drift['kind']}): hidden states "
                     f"{drift['hidden_relative_diff']:.3g} relative "
                     f"(tolerance {s['tolerances']['hidden_relative']:.3g})")
    t = s["timings"]
    lines.append(f"  time: moejax {t['moejax_forward_s']:.1f} s (first batch, with compile, "
                 f"{t['moejax_first_batch_s']:.1f} s; waited for: {t['moejax_wait_s']:.1f} s), transformers "
                 f"{t['reference_forward_s']:.1f} s, comparison {t['compare_s']:.1f} s, total {t['total_s']:.1f} s")
    lines.append(f"verdict: {'PASS' if result.passed else 'FAIL'}" + (f" (wrote {result.out})" if result.out else ""))
    return "\n".join(lines)
