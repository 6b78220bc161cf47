"""Two processes on localhost, 4 CPU devices each, under jax.distributed (gloo collectives): the same code as one
process, across hosts.

The sharded forward over the 8-device mesh equals this process's one-device forward (logits <= 1e-5, selected
experts identical, or a proven near tie forced and then compared), with each process holding only its own devices'
parameter shards; the routing statistics across both processes equal the one-device statistics (counts exact,
float sums within 1e-5) once any near tie that flipped is forced to the one-device choice; and `moejax analyze`
across both processes writes the tables of those statistics.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import moejax
from moejax.data.corpus import chunk, read_corpus
from moejax.data.tokenize import HFTokenizer
from moejax.models.common import ForcedRouting
from moejax.parallel.mesh import simulated_devices_env
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer
from moejax.parity.ties import OTHER, classify_flips, router_rules
from moejax.routing.analysis import collect

pytestmark = [pytest.mark.torch, pytest.mark.multidevice, pytest.mark.slow]
HERE = Path(__file__).parent


def test_two_processes_equal_one(tmp_path):
    path = tmp_path / "model"
    make_checkpoint("qwen3_moe", path, seed=5, vocab_size=259)
    save_byte_tokenizer(path)
    model = moejax.from_pretrained(path)
    tokenizer = HFTokenizer(path)
    sentences = {lang: lines[:40] for lang, lines in read_corpus(None, ["en", "he"]).items()}
    data = tmp_path / "corpus"
    data.mkdir()
    for lang, lines in sentences.items():
        (data / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    corpus = chunk(sentences, 100, "paragraph")
    common = dict(exclude_ids=sorted(tokenizer.special_ids), batch_size=8, probabilities="softmax", seed=0)
    one_device, routing = {}, {}
    for lang, texts in corpus.items():
        one_device[lang] = collect(model, tokenizer, texts, keep_routing=True, **common)
        for c, chunk_routing in enumerate(one_device[lang].routing):
            routing[f"{lang}/{c}/ids"], routing[f"{lang}/{c}/logits"] = (chunk_routing.expert_ids,
                                                                       chunk_routing.router_logits)
    np.savez(tmp_path / "one_device.npz", **routing)

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = simulated_devices_env(4, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), str(port), str(path),
                               str(data), str(tmp_path / "one_device.npz"), str(tmp_path / "out.npz")], env=env,
                              cwd=HERE.parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = np.load(tmp_path / "out.npz")

    for lang, run in one_device.items():
        for name in ("topk_counts", "top1_counts", "tokens", "pairs"):
            np.testing.assert_array_equal(results[f"{lang}/{name}"], getattr(run, name), err_msg=f"{lang} {name}")
        for name in ("prob_sums", "entropy_sums_bits", "pair_jaccard_sums"):
            np.testing.assert_allclose(results[f"{lang}/{name}"], getattr(run, name), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{lang} {name}")

    ids = np.random.default_rng(0).integers(3, 259, (4, 24))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    content = mask.astype(bool)
    want = model(ids, mask, return_router_logits=True)
    want_ids = np.stack([np.asarray(a) for a in want.router_expert_ids])
    for spec in ("expert=8", "data=2,expert=2,tensor=2"):
        got_ids = results[f"{spec}/expert_ids"]
        forced = ForcedRouting(np.zeros_like(want_ids), np.zeros(want_ids.shape[:-1], bool))
        for layer, rule in enumerate(router_rules(model)):
            flips = classify_flips(rule, np.asarray(want.router_logits[layer])[content], want_ids[layer][content],
                                   results[f"{spec}/router_logits"][layer][content], got_ids[layer][content])
            assert not (flips.kind == OTHER).any(), f"{spec}, MoE layer {layer}: routing differs beyond a near tie"
            rows, cols = (where[flips.token] for where in np.nonzero(content))
            forced.mask[layer, rows, cols] = True
            forced.expert_ids[layer, rows, cols] = got_ids[layer, rows, cols]
        # Where a near tie flipped, the one-device model takes the sharded run's experts: then like for like.
        reference = model(ids, mask, forced_routing=forced) if forced.mask.any() else want
        assert np.abs(results[f"{spec}/logits"] - np.asarray(reference.logits))[content].max() <= 1e-5, spec
