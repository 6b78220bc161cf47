"""One of two processes of the multi-host check (tests/multidevice/test_multihost.py starts both): 4 CPU devices
each, joined by jax.distributed into one 8-device mesh, running the same code as one process would.

argv: process id, coordinator port, checkpoint directory, corpus directory ({lang}.txt), the one-device routing
(.npz, written by the test), output .npz (written by process 0).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.py

from support import tie_forcing  # noqa: E402

import moejax  # noqa: E402
from moejax.cli import main  # noqa: E402
from moejax.data.corpus import chunk, read_corpus  # noqa: E402
from moejax.data.tokenize import HFTokenizer  # noqa: E402
from moejax.parallel.mesh import make_mesh  # noqa: E402
from moejax.routing.analysis import ChunkRouting, LangRun, ModelRun, build_tables, collect  # noqa: E402

process_id, port, checkpoint, data, one_device, out = int(sys.argv[1]), *sys.argv[2:7]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4

ids = np.random.default_rng(0).integers(3, 259, (4, 24))
mask = np.ones_like(ids)
mask[1, 17:] = 0
results = {}
for spec in ("expert=8", "data=2,expert=2,tensor=2"):
    model = moejax.from_pretrained(checkpoint, mesh=make_mesh(spec))
    got = model(ids, mask, return_router_logits=True)
    results[f"{spec}/logits"] = multihost_utils.process_allgather(got.logits, tiled=True)
    results[f"{spec}/router_logits"] = multihost_utils.process_allgather(jax.numpy.stack(got.router_logits),
                                                                         tiled=True)
    results[f"{spec}/expert_ids"] = multihost_utils.process_allgather(jax.numpy.stack(got.router_expert_ids),
                                                                      tiled=True)
    # Each process holds (and read) only the parameter shards of its own devices.
    experts = model.layers.units[0][0].mlp.experts.up_edf[...]
    assert len(experts.addressable_shards) == 4 and not experts.is_fully_addressable

# The routing statistics across both processes: every routing flip against the one-device run is a proven near tie
# (tie_forcing asserts it); with the one-device experts forced there, the statistics are computed again.
model = moejax.from_pretrained(checkpoint, mesh=make_mesh("data=2,expert=4"))
tokenizer = HFTokenizer(checkpoint)
corpus = chunk(read_corpus(data, ["en", "he"]), 100, "paragraph")
common = dict(exclude_ids=sorted(tokenizer.special_ids), batch_size=8, probabilities="softmax", seed=0)
saved = np.load(one_device)
runs = {}
for lang, texts in corpus.items():
    reference = LangRun(*(None,) * 8, routing=[ChunkRouting(saved[f"{lang}/{c}/ids"], saved[f"{lang}/{c}/logits"])
                                               for c in range(len(texts))])
    run = collect(model, tokenizer, texts, keep_routing=True, **common)
    forced, flips = tie_forcing(model, reference, run)
    if forced:
        run = collect(model, tokenizer, texts, keep_routing=True, forced=forced, **common)
    results |= {f"{lang}/{name}": getattr(run, name) for name in ("topk_counts", "top1_counts", "tokens", "pairs",
                                                                    "prob_sums", "entropy_sums_bits",
                                                                    "pair_jaccard_sums")}
    results[f"{lang}/flips"] = np.array(flips)
    runs[lang] = collect(model, tokenizer, texts, **common)

# The analysis command across both processes (each computes every chunk's statistics, the first writes OUT): its
# tables are those of the statistics just computed the same way.
analysis = out.replace(".npz", "-analysis")
assert main(["analyze", "--quiet", "--model", checkpoint, "--langs", "en,he", "--data", data, "--chunk-words", "100",
             "--mesh", "data=2,expert=4", "--out", analysis]) == 0
if process_id == 0:
    np.savez(out, **results)
    cfg = model.config
    tables = build_tables([ModelRun(Path(checkpoint).name, checkpoint, cfg.model_type, cfg.moe_layers,
                                    cfg.num_experts_per_tok, cfg.num_routed_experts, common["exclude_ids"], runs)],
                          ["en", "he"], 0)
    for table in ("layers", "experts"):
        with open(Path(analysis) / f"{table}.csv") as f:
            written = list(csv.DictReader(f))
        assert written == [{key: str(value) for key, value in row.items()} for row in tables[table]], table
jax.distributed.shutdown()
